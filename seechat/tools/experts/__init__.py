"""`seechat experts`: offline experts trained on the user's own data (nothing is downloaded).

    corpus.py     LLaVA records -> question/answer pairs, the questions whose answers describe
                  the image (class-like answers), a caption per image
    tokenizer.py  byte-level BPE on the data's text; the small LM's config
    vision.py     a CLIP ViT pretrained on the data's images: contrastive against the captions,
                  or self-supervised (two views of one image) when no answer describes an image
    lm.py         a Qwen2-architecture LM trained on the data's text, each image replaced by its
                  caption words
    build.py      the command: presets (--size tiny|small), progress, experts.json, and a recipe
                  pair (align, finetune) that uses them
"""
