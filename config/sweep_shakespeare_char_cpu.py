# A learning-rate grid on the CPU recipe (config/train_shakespeare_char_cpu.py): three trials of
# about 75 s each on 2 cores. python sweep.py config/sweep_shakespeare_char_cpu.py; see the trials
# with python sweep.py --show out-sweep-shakespeare-char and python plot.py out-sweep-...
# min_lr follows learning_rate (learning_rate / 10, as in the train config): sweep.py says so
# when it starts; set derived = {"min_lr": ...} to choose otherwise.

out_dir = "out-sweep-shakespeare-char"
train_config = "config/train_shakespeare_char_cpu.py"
flags = {}  # the recipe as it is
grid = {"learning_rate": [5e-4, 1e-3, 2e-3]}
objective = "val_loss"
