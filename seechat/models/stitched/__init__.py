"""seechat.models.stitched."""
