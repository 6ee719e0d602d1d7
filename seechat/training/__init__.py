"""seechat.training."""
