"""Model folders: lazy safetensors reading (:mod:`.folder`), tensor name -> layer and kind (:mod:`.layers`),
compatibility checks (:mod:`.compat`), sharded atomic writing (:mod:`.writer`), transformers loading (:mod:`.hf`)."""
