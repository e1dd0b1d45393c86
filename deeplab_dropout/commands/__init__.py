"""The console scripts' entry points (pyproject.toml's [project.scripts]), light: each prints ``--help`` and
every input error (an override, a config value, a path) before it imports torch, and imports the command's
own module (deeplab_dropout.train, .eval, .report, .data) only to do the work. Each Hydra app lives in a
module named after its command, as Hydra names the job (and so its log, ``train.log``) after the module;
``python -m deeplab_dropout.<command>`` runs the same command through that module's own app.
"""
