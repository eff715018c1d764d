"""Configuration of an exported FTP model (see modeling_ftp.py); the field names are ftplm's ModelConfig's."""

from transformers import PretrainedConfig


class FTPConfig(PretrainedConfig):
    """Shape of an FTP model: a GPT-style trunk (n_*) and the small future-token decoder (dec_*, n_future, n_pseudo)."""

    model_type = "ftplm_ftp"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        vocab_size: int = 8192,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.0,
        bias: bool = False,
        n_future: int = 4,
        n_pseudo: int = 8,
        dec_n_layer: int = 1,
        dec_n_head: int = 4,
        dec_n_embd: int = 256,
        pseudo_norm: bool = False,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.bias = bias
        self.n_future = n_future
        self.n_pseudo = n_pseudo
        self.dec_n_layer = dec_n_layer
        self.dec_n_head = dec_n_head
        self.dec_n_embd = dec_n_embd
        self.pseudo_norm = pseudo_norm
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = True  # the LM head is the decoder's token embedding
        super().__init__(**kwargs)
