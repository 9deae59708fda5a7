"""The code that ``conceptvlm export --hf`` ships inside a model directory for
``transformers``' ``trust_remote_code`` loading (see :mod:`conceptvlm.hf_export`)."""
