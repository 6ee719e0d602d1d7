"""seechat.experiments."""
