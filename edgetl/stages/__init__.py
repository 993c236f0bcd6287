"""Pipeline stages: each module has ``run(state, recipe) -> state`` and is listed once in pipeline._stages."""
