# train GPT-2 124M from scratch on OpenWebText to a val loss of ~2.85 (nanoGPT's recipe): about
# 4 days on one node of 8 A100 40GB. First: python data/openwebtext/prepare.py, then
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = False  # True to log to wandb (pip install wandb)
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

# 12 batch size * 1024 block size * 40 gradient accumulation = 491,520 tokens per iteration.
# gradient_accumulation_steps is the total over all ranks: 5 micro-steps on each of 8 GPUs here,
# and the same global batch on fewer GPUs (each rank does more micro-steps)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 iterations: ~300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000

log_interval = 10
checkpoint_interval = 1000  # with eval_interval: at most 1000 iterations (~1.5 h) lost to a crash

weight_decay = 1e-1
