"""A stand-in model for tests: each generate() call "generates" the next canned assistant output."""

from gptoss_ext import tokenizer as tok


class ReplayModel:
    """Each generate() call "generates" the next canned assistant output (harmony text, what follows
    `<|start|>assistant`), token by token, stopping at a stop token as a model would."""

    def __init__(self, replies: list[str]):
        self._replies = [tok.encode(r) for r in replies]

    def generate(self, prompt, max_new_tokens: int = 1024, stop_tokens=(), stream: bool = False, **_):
        if not self._replies:
            raise ValueError("ReplayModel: no replies left")
        reply = self._replies.pop(0)

        def tokens():
            for t in reply[:max_new_tokens]:
                yield t
                if t in stop_tokens:
                    return
        return tokens() if stream else list(tokens())
