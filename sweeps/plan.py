"""
What a sweep runs: its trials' knobs, read from the sweep config and checked before any trial runs.

A trial is train.py with the sweep's train_config, then its `flags`, then the knobs the grid or the
search gave it, then the knobs derived from those (DERIVED, or the sweep's own `derived`). Every
grid combination, and each end of every search range, goes through train.py's own checks here, so
a value train.py would refuse is one line before the first trial, not a failed trial hours in.
"""
import contextlib
import hashlib
import io
import itertools
import json
import os
import re

from configurator import config_keys, configure
from console import UsageError

# knobs that follow another one when only that one is swept: {knob: the knob it keeps its ratio
# to}. min_lr is learning_rate / 10 in nanoGPT's recipes and lr_decay_iters ~ max_iters (the
# cosine's end): a grid over learning_rate that left min_lr absolute would change the schedule's
# shape with every trial, and one over max_iters would stop decaying or decay too early.
DERIVED = {"min_lr": "learning_rate", "lr_decay_iters": "max_iters"}
# what a trial's train.py gets from the sweep, never from the sweep config's flags or grid
OWNED = ("out_dir", "remote_dir", "time_limit", "init_from", "resume_from")
TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def train_defaults():
    """train.py's knobs and their defaults: the globals its source sets above its configure() call
    (run here without the rest of train.py: no torch, no training)."""
    with open(TRAIN, encoding="utf-8") as f:
        source = f.read()
    head = source[:source.index("keys = config_keys(globals())")]
    namespace = {"__file__": TRAIN, "__name__": "train_knobs"}
    exec(compile(head, TRAIN, "exec"), namespace)
    return {k: namespace[k] for k in config_keys(namespace)}


def train_config(defaults, argv):
    """train.py's config for these arguments (config files and --key=value), checked by train.py's
    own rules; a refused value raises UsageError with train.py's error line."""
    namespace, err = dict(defaults), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            configure(namespace, argv)
    except SystemExit:
        raise UsageError(err.getvalue().strip().removeprefix("error: ")) from None
    return {k: namespace[k] for k in defaults}


def flag(key, value):
    """--key=value as configurator.py reads it back: the same value, the same type."""
    return f"--{key}={value!r}" if not isinstance(value, str) else f"--{key}={value}"


class Plan:
    """The sweep config, read and checked: the knobs of every trial and how they are chosen."""

    def __init__(self, sweep):
        """sweep: the sweep config's knobs (sweep.py's globals). Raises UsageError on the first
        thing wrong with it."""
        self.train_config, self.flags = sweep["train_config"], dict(sweep["flags"])
        self.grid, self.search = dict(sweep["grid"]), dict(sweep["search"])
        self.trials, self.objective = sweep["trials"], sweep["objective"]
        self.sampler, self.seed = sweep["sampler"], sweep["seed"]
        self.derived = dict(sweep["derived"])
        if not os.path.isfile(self.train_config):
            raise UsageError(f"train_config {self.train_config!r} is not a file: name a train "
                             "config such as config/train_shakespeare_char_cpu.py")
        defaults = train_defaults()
        for where, knobs in (("flags", self.flags), ("grid", self.grid),
                             ("search", self.search), ("derived", self.derived)):
            for key in knobs:
                if key not in defaults:
                    raise UsageError(f"{where}: train.py has no knob {key!r}")
                if key in OWNED:
                    raise UsageError(f"{where}: {key} is the sweep's to set for each trial, not "
                                     "a knob to sweep or fix")
        for key, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise UsageError(f"grid: {key} needs a non-empty list of values, got {values!r}")
            if len(set(map(repr, values))) != len(values):
                raise UsageError(f"grid: {key} lists a value twice: {list(values)!r}")
        for key, spec in self.search.items():
            self.search[key] = self._range(key, spec, defaults[key])
        both = (set(self.grid) & set(self.search)) | (set(self.flags) & set(self.derived)) | (
            (set(self.grid) | set(self.search)) & (set(self.flags) | set(self.derived)))
        if both:
            raise UsageError(f"{sorted(both)[0]} is set twice (grid, search, flags, derived): "
                             "keep it in one of them")
        if not self.grid and not self.search:
            raise UsageError("the sweep varies nothing: give grid (knob: [values]) or search "
                             "(knob: (low, high)) in the sweep config")
        if self.search and self.trials < 1:
            raise UsageError(f"trials={self.trials}: a search needs trials >= 1 (trials sampled "
                             "per grid combination)")
        if not self.search and self.trials:
            raise UsageError(f"trials={self.trials} without search: a grid runs each "
                             "combination once; drop trials or add a search")
        base_argv = [self.train_config, *(flag(k, v) for k, v in self.flags.items())]
        self.base = train_config(defaults, base_argv)
        self._check_objective(self.grid.get("eval_tasks", [self.base["eval_tasks"]]))
        self.defaults, self.base_argv = defaults, base_argv
        swept = set(self.grid) | set(self.search)
        for knob, leader in DERIVED.items():  # ratios of the train config (after flags)
            if leader in swept and knob not in swept and knob not in self.derived \
                    and knob not in self.flags and self.base[leader]:
                ratio = self.base[knob] / self.base[leader]
                self.derived[knob] = _ratio(knob, leader, ratio, type(self.base[knob]))
        for point in self.points():  # every combination through train.py's checks
            try:
                self.knobs(point)
            except UsageError as e:
                raise UsageError(f"trial knobs {name(point)}: {e}") from None

    def _check_objective(self, eval_tasks):
        """The objective is a loss every eval gives, or a task every trial scores."""
        if self.objective in ("val_loss", "val_bpb", "train_loss"):
            return
        task = re.sub(r"_acc(_norm)?$", "", self.objective)
        if task == self.objective:
            raise UsageError(f"objective={self.objective!r} is not val_loss, val_bpb, train_loss "
                             "or a task's <task>_acc / <task>_acc_norm")
        for tasks in eval_tasks:
            if task not in [t.strip() for t in str(tasks).split(",")]:
                raise UsageError(f"objective={self.objective!r} needs {task} among eval_tasks "
                                 f"(it is {tasks!r}): add flags={{'eval_tasks': '{task}'}}")

    def _range(self, key, spec, default):
        """(low, high) or (low, high, 'log'|'linear'); ints when the knob is one."""
        ok = (isinstance(spec, (list, tuple)) and len(spec) in (2, 3)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[:2])
              and (len(spec) == 2 or spec[2] in ("log", "linear")))
        if not ok or not spec[0] < spec[1]:
            raise UsageError(f"search: {key} needs (low, high) or (low, high, 'log'), low < high; "
                             f"got {spec!r}")
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise UsageError(f"search: {key} is a {type(default).__name__} knob; list its values "
                             "in grid instead")
        log = len(spec) == 3 and spec[2] == "log"
        if log and spec[0] <= 0:
            raise UsageError(f"search: {key} on a log scale needs low > 0, got {spec[0]!r}")
        kind = int if isinstance(default, int) else float
        if kind is int and not all(float(v).is_integer() for v in spec[:2]):
            raise UsageError(f"search: {key} is an int knob: give it int ends, got {spec!r}")
        return (kind(spec[0]), kind(spec[1]), "log" if log else "linear")

    def combinations(self):
        return [dict(zip(self.grid, values))
                for values in itertools.product(*self.grid.values())] or [{}]

    def points(self):
        """Each combination to check: every grid point with each search knob at each end of its
        range (ends taken together: low with low, high with high)."""
        ends = [{}] if not self.search else [{k: r[i] for k, r in self.search.items()}
                                             for i in (0, 1)]
        return [{**g, **e} for g in self.combinations() for e in ends]

    def grid_points(self):
        """The trials to enqueue: every grid combination (trials times over with a search, whose
        knobs the sampler then picks)."""
        return [g for g in self.combinations() for _ in range(max(self.trials, 1))]

    def knobs(self, params):
        """A trial's train.py config (checked) for the swept knobs' values `params`: the base
        config, params, then the derived knobs."""
        knobs = {**self.base, **params}
        for key, rule in self.derived.items():
            try:
                value = rule(dict(knobs)) if callable(rule) else rule
            except Exception as e:
                raise UsageError(f"derived {key} failed: {type(e).__name__}: {e}") from None
            knobs[key] = value
        changed = {**params, **{k: knobs[k] for k in self.derived}}
        train_config(self.defaults, [*self.base_argv,
                                     *(flag(k, v) for k, v in changed.items())])
        return changed

    def fingerprint(self):
        """What makes two sweeps the same experiment, as plain data: a sweep out_dir (or study)
        that holds another is refused. workers, storage, remote_dir, time_limit and the pruning
        knobs may change between runs of the same sweep; the train config's bytes may not."""
        with open(self.train_config, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        first = self.knobs(self.points()[0])  # a derived rule, known by what it gives
        derived = {k: repr(v) for k, v in first.items() if k in self.derived}
        return json.loads(json.dumps(dict(
            train_config=os.path.normpath(self.train_config), train_config_sha256=digest,
            flags=self.flags, grid=self.grid, search=self.search, trials=self.trials,
            objective=self.objective, sampler=self.sampler, seed=self.seed, derived=derived),
            default=repr))


def _ratio(knob, leader, ratio, kind):
    def follow(knobs):
        value = knobs[leader] * ratio
        return int(round(value)) if kind is int else value
    follow.text = f"{knob} = {leader} * {ratio:.6g}"
    return follow


def describe_derived(plan):
    """One line per derived knob, for the sweep's first lines."""
    return [getattr(rule, "text", f"{key} from the sweep config's derived")
            for key, rule in plan.derived.items()]


def value_text(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def name(params, number=None):
    """A trial's folder name: its number, then its swept knobs (`003-learning_rate=0.002`), safe
    as one path component."""
    text = "-".join(f"{k}={value_text(v)}" for k, v in params.items()) or "trial"
    text = re.sub(r"[^A-Za-z0-9_.=+,-]", "_", text)[:100]
    return text if number is None else f"{number:03d}-{text}"

