"""The `alpaca` command and `alpaca run recipe.yaml`: the scripts' commands under one name, and the whole loop
(generate, sft, dpo, evaluate, export, serve) as stages of a recipe, recorded in a run folder's manifest.json."""
