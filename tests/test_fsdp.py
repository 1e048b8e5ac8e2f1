"""FSDP2 and checkpoint folders, with real torchrun (2 gloo ranks on the CPU): the same training as
one process, folders written by every rank and committed whole, resume across world sizes and
between DDP files and FSDP folders, damage found by CRC, consolidation for sample.py and
export.py."""
import os
import shutil
import pickle
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from keep.files import PERIODIC
from keep.store import scan
from keep.files import crc32
from keep.folders import verify_folder
from keep import store
from keep.atomic import TMP_TAG
from conftest import (ROOT, TINY, children, copy_run, outcomes, project_without_data, ranks, run,
                      start, wait_for)
from metrics import read_rows

ARGS = [*TINY, "--dropout=0.0", "--gradient_accumulation_steps=2", "--eval_interval=5",
        "--checkpoint_interval=4", "--keep_last=50",
        "--grad_clip=0.1"]  # a small clip, so that the global grad norm matters
N = 20


def torchrun(out, *extra, nproc=2):
    proc = start(*ARGS, f"--out_dir={out}", *extra, torchrun=[f"--nproc_per_node={nproc}"])
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, stdout
    return stdout


def train_losses(out):
    """{iteration: loss} from metrics.jsonl (full precision; rows a resume redid are superseded)."""
    return {r["iter"]: r["loss"] for r in read_rows(os.path.join(out, "metrics.jsonl"))
            if r["kind"] == "train" and not r.get("superseded")}


def weights(path):
    return store.load(str(path))


def assert_close(a, b, atol=1e-5):
    assert a["iter_num"] == b["iter_num"]
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=atol, msg=k)
    for i in b["optimizer"]["state"]:
        torch.testing.assert_close(a["optimizer"]["state"][i]["exp_avg"],
                                   b["optimizer"]["state"][i]["exp_avg"], rtol=0, atol=atol)


def assert_bitwise(a, b):
    assert a["iter_num"] == b["iter_num"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][i][n], s[n]) for n in s), i
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))


@pytest.fixture(scope="module")
def fsdp_run(shakespeare_char, tmp_path_factory):
    """An uninterrupted 2-rank FSDP run: folders at 4, 8, ..., 20, ckpt.pt at each eval."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(out, "--parallelism=fsdp", f"--max_iters={N}")
    return out


def test_fsdp_trains_as_one_process_does(fsdp_run, tmp_path):
    """Same global batch: every iteration's loss (the mean over the global batch), every eval and
    the final weights and AdamW moments of 2 FSDP ranks equal one process's up to float summation
    order."""
    single = tmp_path / "single"
    run("train.py", *ARGS, f"--out_dir={single}", f"--max_iters={N}")
    ours, one = train_losses(fsdp_run), train_losses(single)
    assert sorted(ours) == list(range(N))
    assert max(abs(ours[i] - one[i]) for i in range(N)) <= 1e-5
    assert_close(weights(fsdp_run / "ckpt-00000020"), weights(single / "ckpt-00000020.pt"))
    names = sorted(os.listdir(fsdp_run / "ckpt-00000020"))
    # every rank wrote its shard
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    best = store.load(str(fsdp_run / "ckpt.pt"))  # ckpt.pt stays one file, gathered to rank 0
    assert best["metadata"]["world_size"] == 2 and len(best["rng"]) == 2
    assert_bitwise(best, weights(fsdp_run / "ckpt-00000020"))  # same iteration, same state


def test_resume_across_world_sizes_and_modes(fsdp_run, tmp_path):
    """DDP file -> FSDP on 2 ranks -> FSDP alone (2 -> 1) -> 2 ranks again (1 -> 2) -> one process
    without FSDP: the data stream is exact, so every loss and the end state match the uninterrupted
    FSDP run."""
    out = tmp_path / "moved"
    torchrun(out, "--max_iters=4")  # DDP: ckpt-00000004.pt
    p = torchrun(out, "--parallelism=fsdp", "--max_iters=8")
    assert f"resuming from {out}/ckpt-00000004.pt at iteration 4" in p
    assert "changed on resume: parallelism 'ddp' -> 'fsdp'" in p
    # the same command: FSDP, stored
    one = run("train.py", f"--out_dir={out}", "--max_iters=12").stdout
    assert "resuming from" in one and "ckpt-00000008 at iteration 8" in one
    assert "written by 2 rank(s), this run has 1" in one
    p = torchrun(out, "--max_iters=16")
    assert "ckpt-00000012 at iteration 12" in p
    last = run("train.py", f"--out_dir={out}", "--parallelism=ddp", f"--max_iters={N}").stdout
    assert "ckpt-00000016 at iteration 16" in last
    assert [n for n in sorted(os.listdir(out)) if n.startswith("ckpt-")] == [
        "ckpt-00000004.pt", "ckpt-00000008", "ckpt-00000012", "ckpt-00000016", "ckpt-00000020.pt"]
    ours, ref = train_losses(out), train_losses(fsdp_run)
    assert sorted(ours) == list(range(N))
    assert max(abs(ours[i] - ref[i]) for i in range(N)) <= 1e-5
    assert_close(weights(out / "ckpt-00000020.pt"), weights(fsdp_run / "ckpt-00000020"))


def test_rank_killed_mid_save_leaves_no_folder_and_resume_is_exact(fsdp_run, tmp_path):
    """kill -9 of one rank while the ranks write a folder: the half-written folder keeps its temp
    name, is never picked, and is removed at the next start. The same command resumes from the
    newest whole folder, now saving in the background (async_save), and ends bitwise equal to the
    uninterrupted run, every folder written in the background holding the state of its own
    iteration."""
    out = tmp_path / "killed"
    proc = start(*ARGS, f"--out_dir={out}", "--parallelism=fsdp", f"--max_iters={N}",
                 "--checkpoint_interval=1", torchrun=["--nproc_per_node=2"])
    seen = None
    while seen is None and proc.poll() is None:
        temps = [n for n in os.listdir(out) if TMP_TAG in n and n.startswith(".ckpt-0000001")] \
            if out.exists() else []
        if temps:
            workers = children(proc.pid)
            os.kill(max(workers), signal.SIGKILL)  # one rank, in the middle of its write
            seen = temps[0]
        time.sleep(0.001)
    proc.communicate(timeout=120)
    assert seen is not None and proc.returncode != 0
    assert os.path.isdir(out / seen)  # the folder being written: still under its temp name
    final_name = seen[1:seen.index(TMP_TAG)]
    assert not os.path.exists(out / final_name)
    whole = [n for n in os.listdir(out) if re.fullmatch(r"ckpt-\d{8}", n)]
    for name in whole:
        verify_folder(str(out / name))  # every folder under a checkpoint's name is whole
    head = scan(str(out))[0][0]  # the newest whole checkpoint (ckpt.pt after an eval)

    # SIGTERM while background saves are in flight: the one in flight is committed, then the final
    # one
    job = start(*ARGS, f"--out_dir={out}", "--async_save=True",
                torchrun=["--nproc_per_node=2", "--shutdown-timeout=60"])
    lines = []
    wait_for(job, r"^iter 14:", lines)
    job.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks (and then exits 1 itself)
    p = "".join(lines) + job.communicate(timeout=120)[0]
    assert f"resuming from {head['path']} at iteration {head['iter_num']}" in p
    assert not os.path.exists(out / seen)
    stopped = int(re.search(r"^checkpoint saved at iteration (\d+)", p, re.M).group(1))
    assert "SIGTERM received" in p and stopped >= 15
    verify_folder(str(out / f"ckpt-{stopped:08d}"))
    p = torchrun(out)  # the same command again: on to max_iters, background saves as stored
    assert f"at iteration {stopped}" in p
    for it in range(head["iter_num"] + 1, N + 1):
        if it % 4 == 0:
            assert_bitwise(weights(out / f"ckpt-{it:08d}"), weights(fsdp_run / f"ckpt-{it:08d}"))
    assert not [n for n in os.listdir(out) if TMP_TAG in n]


@pytest.mark.parametrize("background", [False, True])
def test_failed_folder_write_is_one_line_and_training_goes_on(shakespeare_char, tmp_path,
                                                              background):
    """RLIMIT_FSIZE below a shard's size on both ranks: every folder save fails with EFBIG (DCP
    raises on every rank). One warning line, no temp folder left, training goes on; once the limit
    is lifted the next folder is written."""
    def small_files():  # the soft limit only, so that the test can lift it (prlimit)
        # a shard is ~250 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))

    out = tmp_path / "full"
    job = start(*ARGS, f"--out_dir={out}", "--parallelism=fsdp", "--max_iters=2000",
                "--eval_interval=1000", f"--async_save={background}",
                torchrun=["--nproc_per_node=2", "--shutdown-timeout=60"], preexec_fn=small_files)
    seen = []
    # (DCP's writer sees EFBIG as a short write; a file's write sees the errno itself)
    m = wait_for(job, r"^warning: could not write (\S+) \(rank \d: (\[Errno 27\] File too large|a "
                      r"short write: the disk, a quota or a file-size limit is full .*)\); older "
                      r"checkpoints are intact; training goes on and the next checkpoint tries "
                      r"again$", seen)
    assert m.group(1) == str(out / "ckpt-00000004")
    wait_for(job, r"^iter 9:", seen)  # still training, past the next failed save
    # no folder under a checkpoint's name
    assert not [n for n in os.listdir(out) if n.startswith("ckpt")]
    for pid in [job.pid, *children(job.pid)]:
        resource.prlimit(pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    m = wait_for(job, r"^(saved|writing) (\S+ckpt-\d+)$", seen)
    job.send_signal(signal.SIGTERM)
    seen.append(job.communicate(timeout=120)[0])
    verify_folder(m.group(2))
    assert not [n for n in os.listdir(out) if TMP_TAG in n]  # failed saves left nothing behind
    assert "CheckpointException" not in "".join(seen) and "[rank0]: Traceback" not in "".join(seen)


def pages(path):
    return -(-os.path.getsize(path) // resource.getpagesize())


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_commit_is_the_same_outcome_on_every_rank(shakespeare_char, tmp_path, tmpfs,
                                                           background):
    """A tmpfs with room for the shards of a folder but not for its state.pt, which rank 0 writes
    last, as it commits: torch.save's short write there is a RuntimeError, not an OSError. The save
    at 4 is one warning and training goes on; the final save's failure ends every rank with exit 1
    and the job with one `error:` line (rank 0's); no rank waits for another, no traceback, no temp
    folder left."""
    job = [*ARGS, "--parallelism=fsdp", "--eval_interval=1000", "--checkpoint_interval=4",
           f"--async_save={background}"]
    clean = tmp_path / "clean"  # the sizes of this job's files, from a run with room
    assert all(rc == 0
               for rc, _, _ in outcomes(ranks(2, *job, f"--out_dir={clean}", "--max_iters=4")))
    folder = clean / "ckpt-00000004"
    shards = sum(pages(folder / n) for n in os.listdir(folder) if n != "state.pt")
    assert pages(folder / "state.pt") > 4
    # .lock, metrics.jsonl, the shards, and less room than state.pt needs
    out = tmpfs((2 + shards + 3) * resource.getpagesize()) / "run"
    results = outcomes(ranks(2, *job, f"--out_dir={out}", "--max_iters=8"))
    assert [rc for rc, _, _ in results] == [1, 1], results
    (_, stdout, stderr), (_, _, stderr1) = results
    assert ("iter 7:" in stdout and "Traceback" not in stderr + stderr1
            and "error:" not in stderr1), results
    *earlier, last = stderr.strip().splitlines()
    # (by then ckpt.pt, written at the last eval, may leave no room for the shards either: DCP's
    # short write then, which names no errno)
    assert re.fullmatch(rf"error: could not write {re.escape(str(out / 'ckpt-00000008'))}(: | "
                        r"\(rank \d: )(\[Errno 28\] No space left on device|a short write: .*)\)?; "
                        r"older checkpoints are intact, and the same command resumes from the "
                        r"newest", last), stderr
    assert (f"warning: could not write {out / 'ckpt-00000004'}: [Errno 28] No space left on "
            "device; older checkpoints are intact; training goes on and the next checkpoint tries "
            "again" in earlier), stderr
    # (ckpt.pt too, at 8)
    assert all(ln.startswith("warning: could not write") for ln in earlier), stderr
    # no folder, no temp
    assert [n for n in os.listdir(out) if n.startswith(("ckpt-", ".ckpt-"))] == []


def test_torchrun_into_a_busy_or_unwritable_out_dir_is_one_line(fsdp_run, tmp_path):
    """Only rank 0 checks out_dir (lock, writability); every rank stops with it, so a second job
    into a folder in use is one error line, not a rank dying in a collective with a traceback."""
    out = copy_run(fsdp_run, tmp_path / "busy")
    first = start(f"--out_dir={out}", "--max_iters=100000")  # FSDP alone, as stored
    wait_for(first, r"^iter 21:")
    second = start(f"--out_dir={out}", "--max_iters=100000", torchrun=["--nproc_per_node=2"])
    output = second.communicate(timeout=120)[0]
    assert second.returncode != 0
    assert output.count(f"error: out_dir {str(out)!r} is in use by another training process (pid "
                        f"{first.pid})") == 1
    assert "[rank1]" not in output and "Connection closed" not in output, output
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 0


@pytest.mark.parametrize("bad, code, words", [
    (["--dataset=_no_such_data"], 1, "dataset '_no_such_data' ("),  # dataset.py's RunError
    # fail()
    (["--block_size=111540"], 2, "block_size=111540 is too long for dataset 'shakespeare_char'"),
])
def test_a_bad_input_met_by_every_rank_is_one_error_line(shakespeare_char, tmp_path, bad, code,
                                                         words):
    """Met once the process group is up, on every rank: rank 0's line is the job's one `error:`
    line, the others say which rank they are, each line whole, and a rank exits with the code (its
    interpreter shutdown, with gloo's threads alive, used to abort some ranks: SIGABRT in torchrun's
    report). torchrun ends the other ranks (SIGTERM) once the first one exits, so which ranks get to
    write their line before that is a race: none of them is required."""
    proc = start(*TINY, f"--out_dir={tmp_path}", *bad, torchrun=["--nproc_per_node=4"])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output  # torchrun's, for any failed worker
    said = [line for line in output.splitlines() if "error: " in line]
    assert said and all(re.fullmatch(rf"(rank [123]: )?error: {re.escape(words)}.*", line)
                        for line in said), output
    assert len([line for line in said if line.startswith("error: ")]) <= 1, output
    assert ("terminate called" not in output and "SIGABRT" not in output
            and f"exitcode  : {code} (pid" in output)


DAMAGE = {
    "flipped byte in a shard": (lambda f: _flip(f / "__1_0.distcp"),
                                "corrupt (CRC mismatch in __1_0.distcp)"),
    "truncated shard": (lambda f: _truncate(f / "__0_0.distcp"), "corrupt (__0_0.distcp has"),
    "missing shard": (lambda f: os.remove(f / "__1_0.distcp"),
                      "incomplete (__1_0.distcp is missing)"),
    "damaged state.pt": (lambda f: _flip(f / "state.pt", at=0.5), "state.pt"),
    "no state.pt": (lambda f: os.remove(f / "state.pt"), "not a checkpoint folder (no state.pt"),
}


def _flip(path, at=0.6):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_folder_is_refused(fsdp_run, tmp_path, damage):
    out = copy_run(fsdp_run, tmp_path / "copy")
    do, why = DAMAGE[damage]
    do(out / "ckpt-00000020")
    # every file's CRC checked: the bad one named
    listing = run("checkpoint.py", str(out), check=False).stdout
    assert re.search(r"ckpt-00000020/ .* BAD: .*" + re.escape(why), listing), listing
    assert re.search(r"ckpt-00000016/ .* ok", listing)


def test_damaged_folder_falls_back_to_the_previous_one(fsdp_run, tmp_path):
    """A shard with a flipped byte: the resume says so, continues from the previous folder (one
    process, FSDP as stored), and writes the iteration again in place of the damaged folder."""
    out = copy_run(fsdp_run, tmp_path / "copy")
    os.remove(out / "ckpt.pt")  # else the fall-back would be ckpt.pt, written at the same iteration
    _flip(out / "ckpt-00000020" / "__1_0.distcp")
    p = run("train.py", f"--out_dir={out}", f"--max_iters={N}", "--keep_last=1")
    assert ("warning: skipping" in p.stdout
            and "corrupt (CRC mismatch in __1_0.distcp); falling back to ckpt-00000016" in p.stdout)
    assert "at iteration 16" in p.stdout
    assert_close(weights(out / "ckpt-00000020"), weights(fsdp_run / "ckpt-00000020"))
    # the damaged folder was replaced whole; keep_last=1 left only the newest folder
    assert (sorted(n for n in os.listdir(out) if n.startswith("ckpt"))
            == ["ckpt-00000020", "ckpt.pt"])


def test_planted_pickle_in_dcp_metadata_never_runs(fsdp_run, tmp_path):
    """DCP unpickles .metadata with plain pickle: a planted payload is refused before DCP reads
    it."""
    out = copy_run(fsdp_run, tmp_path / "copy")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (out / "ckpt-00000020" / ".metadata").write_bytes(pickle.dumps(Payload()))
    # the files' CRCs are rewritten to match, as an attacker would
    state = torch.load(out / "ckpt-00000020" / "state.pt", weights_only=True)
    state["files"][".metadata"] = crc32(str(out / "ckpt-00000020" / ".metadata"))
    torch.save(state, out / "ckpt-00000020" / "state.pt")
    for cmd in (["checkpoint.py", str(out / "ckpt-00000020")],
                ["checkpoint.py", "consolidate", str(out / "ckpt-00000020"),
                 str(tmp_path / "x.pt")],
                ["sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5",
                 "--device=cpu"]):
        p = run(*cmd, check=False)
        if cmd[0] == "sample.py":  # sample.py reads ckpt.pt, which is fine
            assert p.returncode == 0
        else:
            assert (p.returncode == 1
                    and "refused, its .metadata needs arbitrary pickle" in p.stderr), p.stderr
    assert not marker.exists()


def test_consolidated_folder_samples_and_exports(fsdp_run, tmp_path):
    """`checkpoint.py consolidate` gives the file a single process would have written: sample.py
    prints what it prints from ckpt.pt of the same iteration, export.py makes an HF model with the
    same logits; sample.py also reads a folder directly when out_dir holds nothing else, without the
    dataset."""
    from transformers import GPT2LMHeadModel

    from model import GPT, GPTConfig
    (tmp_path / "one").mkdir()
    p = run("checkpoint.py", "consolidate", str(fsdp_run / "ckpt-00000020"),
            str(tmp_path / "one" / "ckpt.pt"))
    assert "wrote" in p.stdout
    sample = ["--num_samples=2", "--max_new_tokens=40", "--temperature=0", "--device=cpu"]
    text = run("sample.py", f"--out_dir={tmp_path / 'one'}", *sample).stdout
    assert text == run("sample.py", f"--out_dir={fsdp_run}", *sample).stdout and len(text) > 80
    only = tmp_path / "folder_only"
    only.mkdir()
    os.rename(copy_run(fsdp_run, tmp_path / "c") / "ckpt-00000020", only / "ckpt-00000020")
    assert run("sample.py", f"--out_dir={only}", *sample).stdout == text
    # a folder carries its tokenizer too: sampled on a copy of the project that has no data/
    elsewhere = project_without_data(tmp_path / "machine")
    assert run(os.path.join(elsewhere, "sample.py"), f"--out_dir={only}", *sample,
               cwd=elsewhere).stdout == text

    run("export.py", f"--ckpt={fsdp_run / 'ckpt-00000020'}", f"--to={tmp_path / 'hf'}")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    state = store.load(str(tmp_path / "one" / "ckpt.pt"))
    ours = GPT(GPTConfig(**state["model_args"]))
    ours.load_state_dict(state["model"])
    ours.eval()
    idx = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx, idx)[0], rtol=0, atol=1e-5)
    bad = run("checkpoint.py", "consolidate", str(tmp_path / "one" / "ckpt.pt"),
              str(tmp_path / "y.pt"), check=False)
    assert bad.returncode == 1 and "not a checkpoint folder" in bad.stderr
    again = run("checkpoint.py", "consolidate", str(fsdp_run / "ckpt-00000016"),
                str(tmp_path / "one" / "ckpt.pt"),
                check=False)  # never over an existing file (a run's ckpt.pt, say)
    assert again.returncode == 1 and "exists; give a new file name" in again.stderr
    assert store.load(str(tmp_path / "one" / "ckpt.pt"))["iter_num"] == 20
    piped = subprocess.run(f"{sys.executable} checkpoint.py {fsdp_run} | head -1", shell=True,
                           cwd=ROOT,
                           capture_output=True, text=True)  # the reader leaves early: no traceback
    assert piped.stdout.startswith("file (newest first)") and piped.stderr == ""


def test_a_shard_one_rank_cannot_read_at_resume_is_one_line_on_every_rank(fsdp_run, tmp_path):
    """Rank 1 cannot read its shard when DCP loads the folder (EIO from the second open of it on:
    the first is the CRC check, which passes): every rank stops with exit 1 and one `error:` line
    naming the folder, no traceback, none left waiting. Before: DCP's CheckpointException (a
    BaseException) came out of every rank as a traceback."""
    from test_faults import traced
    out = copy_run(fsdp_run, tmp_path / "run")
    for name in os.listdir(out):
        if name.startswith("ckpt") and name != PERIODIC.format(N)[:-3]:
            shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    shard = out / PERIODIC.format(N)[:-3] / "__1_0.distcp"
    job = ranks(2, *ARGS, "--parallelism=fsdp", f"--out_dir={out}", f"--max_iters={N + 4}",
                prefix={1: traced("-P", str(shard), "-e", "trace=openat", "-e",
                                  "inject=openat:error=EIO:when=2+")})
    results = outcomes(job, timeout=120)
    said = "".join(o + e for _, o, e in results)
    assert [rc for rc, _, _ in results] == [1, 1], said
    errors = [ln for ln in said.splitlines() if "error:" in ln]
    assert errors and all("ckpt-00000020" in ln for ln in errors), said
    assert "Traceback" not in said and f"iter {N}:" not in said, said
