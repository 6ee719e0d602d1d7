"""seechat.inference."""
