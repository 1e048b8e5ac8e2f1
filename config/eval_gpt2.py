# evaluate OpenAI's gpt2 (124M: n_layer 12, n_head 12, n_embd 768) on OpenWebText, no training:
# python train.py config/eval_gpt2.py (after data/openwebtext/prepare.py); nanoGPT measured
# train/val 3.11/3.12
out_dir = "out-eval-gpt2"  # eval_only writes no checkpoint
batch_size = 8
eval_tokens = 0  # the whole val split, each token once
eval_only = True
wandb_log = False
init_from = "gpt2"
