# evaluate OpenAI's gpt2-large (774M: n_layer 36, n_head 20, n_embd 1280) on OpenWebText, no
# training:
# python train.py config/eval_gpt2_large.py (after data/openwebtext/prepare.py); nanoGPT measured
# train/val 2.66/2.67
out_dir = "out-eval-gpt2-large"  # eval_only writes no checkpoint
batch_size = 8
eval_tokens = 0  # the whole val split, each token once
eval_only = True
wandb_log = False
init_from = "gpt2-large"
