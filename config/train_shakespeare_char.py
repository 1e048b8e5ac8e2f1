# a baby GPT on tiny Shakespeare, characters: nanoGPT's GPU recipe (~3 min on one A100-class GPU)
# prepare the data first: python data/shakespeare_char/prepare.py

out_dir = "out-shakespeare-char"
eval_interval = 250  # the model overfits this small data: watch val loss often
eval_tokens = 0  # the whole val split (111,540 tokens)
log_interval = 10
always_save_checkpoint = False  # ckpt.pt only when val improves
checkpoint_interval = 250

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

# baby GPT
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a larger rate
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit larger: few tokens per iteration
warmup_iters = 100
