"""seechat.tools."""
