"""convgen's kernel generator: spec table -> template context -> render -> write.

Stages, each testable on its own:
    spec.py / table.py   what to generate (KernelSpec, SPECS)
    context.py           spec -> flat template values (all index arithmetic)
    render.py            Jinja2 with StrictUndefined
    emit.py              write only what changed into convgen/_generated
The build (setup.py) calls emit.write_all() and then cythonizes the result.
"""

from .spec import ANY, KernelSpec
from .table import SPECS

__all__ = ["ANY", "KernelSpec", "SPECS"]
