# evaluate OpenAI's gpt2-medium (350M: n_layer 24, n_head 16, n_embd 1024) on OpenWebText, no
# training:
# python train.py config/eval_gpt2_medium.py (after data/openwebtext/prepare.py); nanoGPT measured
# train/val 2.85/2.84
out_dir = "out-eval-gpt2-medium"  # eval_only writes no checkpoint
batch_size = 8
eval_tokens = 0  # the whole val split, each token once
eval_only = True
wandb_log = False
init_from = "gpt2-medium"
