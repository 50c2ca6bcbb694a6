"""What combines curate with the trainer: the equal-budget study, InstructDiff's iterations, the demo. The only part of curate that imports train.

Importing it sets the libraries' log levels first (curate.kernel.logs): the trainer imports torch and
transformers at module level, and they read their levels (torch's C++ warnings, transformers' progress bars)
when they load. The ``curate`` command has set them already; ``python -m curate.experiments.demo`` has not."""

from curate.kernel import logs

logs.quiet_libraries()
