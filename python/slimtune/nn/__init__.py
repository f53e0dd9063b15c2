"""Drop-in torch.nn modules backed by slimtune ops."""
