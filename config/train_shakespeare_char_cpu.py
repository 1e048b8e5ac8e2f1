# tiny Shakespeare on a CPU: the CPU recipe (74 s of training on 2 cores, README), used by
# `make demo` on machines without a GPU. Same data and vocab as the GPU recipe, a smaller model and
# context.

out_dir = "out-shakespeare-char"
eval_interval = 250
eval_tokens = 16384  # the first 256 windows of 64 tokens of each split
log_interval = 10
always_save_checkpoint = False
checkpoint_interval = 250

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
# bf16 autocast is many times slower on CPUs without bf16 matrix units (bench.py --dtype=...)
dtype = "float32"
compile = False  # no speed-up for a model this small, and compiling takes a good part of the run
