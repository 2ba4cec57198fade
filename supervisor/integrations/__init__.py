"""Ready-made callbacks that put a framework's training loop under the supervisor (protocol mode).

- `supervisor.integrations.lightning.SupervisorCallback`: a `lightning.pytorch.Callback`.
- `supervisor.integrations.transformers.SupervisorCallback`: a `transformers.TrainerCallback`.

Each reports steps (a non-finite loss ends the attempt as `nan`), evaluations and checkpoints, saves and
announces its checkpoints atomically under the names the run expects, serves the watchdog's checkpoint
requests, and tells the script what to resume from. Nothing here is imported by `supervisor` itself:
the framework is imported only when its module is. Usage, hooks, resume and limits: docs/integrations.md.
"""
