# make demo: fresh machine -> .venv with pinned deps, data, a short training run, samples, a loss plot.
# make test: the whole test suite (CPU only, no network).
PY := .venv/bin/python
# a GPU machine runs nanoGPT's recipe; a CPU machine a CPU-sized one (74 s of training on 2 cores: README)
DEMO_CONFIG = $(shell $(PY) -c "import torch; print('config/train_shakespeare_char.py' if torch.cuda.is_available() else 'config/train_shakespeare_char_cpu.py')")

.PHONY: demo test clean

.venv/ok: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch .venv/ok

.venv/test-ok: .venv/ok requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch .venv/test-ok

data/shakespeare_char/train.bin: .venv/ok data/shakespeare_char/prepare.py
	$(PY) data/shakespeare_char/prepare.py

# A second `make demo` continues the first one's run (train.py resumes any out_dir that holds a
# good checkpoint); a finished run just says so.
demo: .venv/ok data/shakespeare_char/train.bin
	$(PY) train.py $(DEMO_CONFIG)
	$(PY) sample.py --out_dir=out-shakespeare-char --num_samples=3 --max_new_tokens=300
	$(PY) plot.py out-shakespeare-char

# two workers, one test file each (a file's fixtures are shared by its tests); the data is
# prepared first so that workers never race to write it; a test that hangs fails after 10 minutes
# instead of holding the suite
test: .venv/test-ok data/shakespeare_char/train.bin
	$(PY) -m pytest -q -n 2 --dist loadfile --timeout=600 tests

clean:
	rm -rf out-shakespeare-char data/*/train.bin data/*/val.bin data/*/meta.pkl
