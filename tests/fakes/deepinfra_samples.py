"""DeepInfra's sample responses for WizardLM-2 8x22B, verbatim from its model page (seeds/003):
the non-stream body (with `usage.estimated_cost`) and the streamed pieces (" ", " Hi", "!", "",
"</s>", then a finish chunk). The fake DeepInfra answers a lone "Hello!" with them.
"""

from __future__ import annotations

from typing import Any

DEEPINFRA_SAMPLE_BODY: dict[str, Any] = {
    "id": "chatcmpl-guMTxWgpFf",
    "object": "chat.completion",
    "created": 1694623155,
    "model": "microsoft/WizardLM-2-8x22B",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": " Hello! It's nice to meet you. Is there something I can help you with"
                " or would you like to chat for a bit?",
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 15,
        "completion_tokens": 16,
        "total_tokens": 31,
        "estimated_cost": 0.0000268,
    },
}
DEEPINFRA_SAMPLE_STREAM = [" ", " Hi", "!", "", "</s>"]
DEEPINFRA_SAMPLE_PROMPT_TOKENS = 15
