# evaluate OpenAI's gpt2-xl (1558M: n_layer 48, n_head 25, n_embd 1600) on OpenWebText, no training:
# python train.py config/eval_gpt2_xl.py (after data/openwebtext/prepare.py); nanoGPT measured
# train/val 2.56/2.54
out_dir = "out-eval-gpt2-xl"  # eval_only writes no checkpoint
batch_size = 8
eval_tokens = 0  # the whole val split, each token once
eval_only = True
wandb_log = False
init_from = "gpt2-xl"
