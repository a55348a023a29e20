"""gqa_tune's recipes, installed as the package ``gqa_tune.recipes``.

torchtune's wheel ships a top-level ``recipes`` package that raises on import
and shadows this folder, so run these as
``tune run gqa_tune/recipes/<name>.py --config configs/<file>.yaml`` (the
path turns into the module ``gqa_tune.recipes.<name>``), or with
``gqa-tune run <name> --config <config>``.
"""
