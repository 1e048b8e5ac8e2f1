# fine-tune GPT-2 XL (1.5B) on tiny Shakespeare in GPT-2 BPE tokens: nanoGPT's recipe, minutes on
# one A100/H100-class GPU. First: python data/shakespeare/prepare.py; the weights come from the
# Hugging Face cache (docs/gpt2.md). A smaller GPU: --init_from=gpt2-medium etc.

out_dir = "out-shakespeare"
eval_interval = 5
eval_tokens = 0  # the whole val split (36,059 tokens)
always_save_checkpoint = False  # ckpt.pt only when val loss improves: a fine-tune overfits quickly
# each checkpoint of gpt2-xl is ~19 GB (weights plus AdamW state): keep only the newest periodic one
checkpoint_interval = 10
keep_last = 1

wandb_log = False  # feel free to turn on (pip install wandb)
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-xl"

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2

# 1 batch * 32 accumulation steps * 1024 tokens = 32,768 tokens per iteration;
# shakespeare has 301,966 train tokens, so one epoch is ~9.2 iterations
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# fine-tune at a constant, small learning rate
learning_rate = 3e-5
decay_lr = False
