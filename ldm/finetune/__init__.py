"""Fine-tuning pretrained models without Lightning (issue 18): ``init`` reads a CompVis single file, a diffusers
folder or an ldm export; ``lora`` applies peft LoRA, merges it and names it the way diffusers does;
``wiring`` joins both to a stage-2 config; ``diffusers_lora`` writes adapters diffusers' loaders accept.

Modules are imported where used (``from ldm.finetune.lora import ...``): the package itself stays light.
"""
