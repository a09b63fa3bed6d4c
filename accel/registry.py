"""Every acceleration method by its spec name."""

from dite.accel.fastattn import FastAttn
from dite.accel.methods import Adaptive, DeltaCache, DiTCache, Method, PromptGate, ToDo
from dite.accel.schedule import StepSchedule
from dite.accel.tuned import Tuned

METHODS: dict[str, type[Method]] = {m.name: m for m in (DiTCache, DeltaCache, Adaptive, StepSchedule, PromptGate,
                                                        ToDo, FastAttn, Tuned)}
ALIASES = {"delta-cache": "deltacache", "deltadit": "deltacache", "delta": "deltacache", "prompt-gate": "promptgate",
           "ditfastattn": "fastattn", "dbcache": "adaptive", "dynamic": "adaptive"}
