"""Export to Hugging Face transformers (`ftplm export RUN OUT --format hf`).

GPT runs become standard GPT-2 checkpoints; FTP runs carry their own modeling code (configuration_ftp.py and
modeling_ftp.py here, copied into the export and loaded with trust_remote_code=True). Those two files depend only on
torch and transformers, never on ftplm, so an export works wherever transformers does. transformers itself is optional
(`pip install 'ftplm[hf]'`): nothing here imports it until an export runs.
"""
