"""Pipeline steps. Each module exposes ``run(ctx)``; ``qjob_runner.pipeline`` orders them."""
