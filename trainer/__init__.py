"""The product: `loop.train_and_evaluate(config, workdir)` ties data, model, parallel steps,
checkpoints and reporting together."""
