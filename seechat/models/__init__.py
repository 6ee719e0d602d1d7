"""seechat.models."""
