"""Entry points (installed as ``hai_llm.launch``): training, data preparation, parameter tables, dry runs."""
