"""Pipeline stages. Each module exposes ``run(ctx)``; ``qjob_runner.pipeline`` orders them."""
