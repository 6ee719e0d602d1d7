"""Native early fusion (Chameleon-style): a VQ image tokenizer whose codes become extra
vocabulary ids of one decoder-only LM, trained through seechat's data path and loop."""
