"""ConceptVLM: vision-language MoE models whose language backbone runs on concepts."""
