"""The pipeline engine, one run's data passing through its modules once, in order.

``spec``       read the YAML (strict, bounded) and apply ``--set`` overrides
``plan``       prepare the inputs (:mod:`qsmkit.inputs`: files, headers, sidecars), validate the
               stages and their parameters, decide which stages run
``outputs``    check the output folder at validation; lock, stage and commit it during a run
``fanout``     run the steps over one acquisition or several (stage ``scope``)
``run``        load the inputs' data, run, record, write
``provenance`` ``provenance.json`` and the ground-truth ``metrics.json``

The contract is DESIGN.md §2.
"""

from .fanout import run_step, run_steps
from .plan import Plan, Step, build_plan, load_plan
from .run import RunResult, load_inputs, run_plan
from .spec import apply_overrides, load_yaml

__all__ = ["Plan", "RunResult", "Step", "apply_overrides", "build_plan", "load_inputs", "load_plan", "load_yaml",
           "run_plan", "run_step", "run_steps"]
