"""An LLMClient for tests: scripted replies, every call logged."""

import threading

from glmjax.data.chat_format import Reply
from glmjax.inference.llm_client import AssistantTurn, LLMClient, SamplingParams, item_sampling


class ScriptedClient(LLMClient):
    """A deterministic client: ``reply(prompt_text, sampling)`` answers each one-user-message
    conversation (item ``i`` of a batch with ``seed + i``); every call is logged as (prompt text,
    sampling)."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []
        self._lock = threading.Lock()

    def complete(self, messages, sampling=None):
        return self.complete_batch([messages], sampling)[0]

    def complete_batch(self, conversations, sampling=None):
        sampling = sampling or SamplingParams()
        replies = []
        for index, messages in enumerate(conversations):
            assert [m["role"] for m in messages] == ["user"]
            params = item_sampling(sampling, index)
            with self._lock:
                self.calls.append((messages[0]["content"], params))
            replies.append(self.reply(messages[0]["content"], params))
        return replies

    def assistant_turns(self, conversations, sampling=None, tools=None):
        return [AssistantTurn(text, [], [], "stop", Reply(text))
                for text in self.complete_batch(conversations, sampling)]
