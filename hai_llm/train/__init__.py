"""hai-llm package."""
