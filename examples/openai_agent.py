"""An agent written against the plain `openai` client, trained as it is: point it at
`spyglass serve` (to record) or `spyglass grpo --serve.port 8000` (to train on what it does).
The only spyglass-specific lines are the session/group ids in `extra_body` and the reward POST.

    python examples/openai_agent.py --base-url http://127.0.0.1:8000/v1 --episodes 8 --group-size 4
"""
import argparse
import json
import re
import urllib.request

from openai import OpenAI

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression such as 17 * 23.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
QUESTIONS = [("What is 17 * 23?", "391"), ("What is 2 ** 10?", "1024"), ("What is 144 / 12?", "12"),
             ("What is 999 + 1?", "1000")]


def calculator(expression: str) -> str:
    if not re.fullmatch(r"[\d\s+\-*/().]{1,64}", expression):
        return "error: only numbers and + - * / ( ) are allowed"
    try:
        return str(eval(expression, {"__builtins__": {}}))  # digits and operators only (checked above)
    except (ArithmeticError, SyntaxError) as e:
        return f"error: {e}"


def episode(client: OpenAI, question: str, session: str, group: str, max_turns: int = 4) -> str:
    messages = [{"role": "system", "content": "Use the calculator, then answer with the number only."},
                {"role": "user", "content": question}]
    for _ in range(max_turns):
        r = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=64,
                                           temperature=1.0, extra_body={"session_id": session, "group_id": group})
        msg = r.choices[0].message
        messages.append(msg)
        if not msg.tool_calls:
            return msg.content or ""
        for call in msg.tool_calls:
            args = json.loads(call.function.arguments or "{}")
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": calculator(str(args.get("expression", "")))})
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4, help="episodes per question (a GRPO group)")
    a = ap.parse_args(argv)
    client = OpenAI(base_url=a.base_url, api_key="-")
    for k in range(a.episodes):
        question, truth = QUESTIONS[(k // a.group_size) % len(QUESTIONS)]
        answer = episode(client, question, session=f"ep-{k}", group=f"q-{k // a.group_size}")
        reward = float(truth in re.findall(r"-?\d+", answer))
        req = urllib.request.Request(f"{a.base_url}/sessions/ep-{k}/reward", data=json.dumps({"reward": reward}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).close()
        print(f"episode {k}: {question} -> {answer[:40]!r} reward {reward}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
