"""The bundled trainer behind ``python -m engine.train``.

One module per job: loop.py (setup and the training loop), args.py (command line and ORCH_*
defaults), checkpointer.py (when to save and resume), monitor.py (everything a run reports
through: metrics.py files, step_timer.py phases, mfu.py FLOPs, tensorboard.py, watchdog.py and
hang_report.py for hangs), data.py (token sources and the global batch sampler). The engine
library at the top of ``engine/`` never imports this package.
"""
