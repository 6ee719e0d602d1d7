"""The embedded default demo: easy-VQA data, tiny experts trained on its training split, and the
align -> finetune -> test pipeline (`python -m seechat.experiments.easyvqa`)."""
