"""The rewrite prompt (adaptive or forced, with or without evidence), its parsing, and an offline math rewriter."""

from __future__ import annotations

import re
from dataclasses import dataclass

from raypipe.engines import Message

RULES = [
    "First judge whether the given format suits what the question asks for. If it does not, copy the original "
    "response unchanged as the revised response; if it does, rewrite the response to follow the format.",
    "Change only the presentation: keep the meaning and every piece of information of the original.",
    "The revised response must still answer the question correctly.",
    "Write fluently and do not add sub-headings the format does not ask for.",
]
EVIDENCE_RULE = ("The evidence below may hold useful facts; decide for yourself which parts, if any, to use, and "
                 "correct the response where the evidence shows it is wrong.")
OUTPUT_RULE = ("Answer in exactly this form and nothing else:\nReasoning: <one or two sentences>\n"
               "Revised response: <the revised response>")


def rewrite_messages(query: str, response: str, format_spec: str, evidence: list[str],
                     adaptive: bool) -> list[Message]:
    """System rules plus a user turn with the question, response, format and (optional) evidence blocks."""
    rules = (RULES if adaptive else RULES[1:]) + ([EVIDENCE_RULE] if evidence else [])
    system = ("You rewrite the format of an AI assistant's response to a user's question. Rules:\n"
              + "\n".join(f"{i}. {rule}" for i, rule in enumerate(rules, start=1)) + "\n" + OUTPUT_RULE)
    blocks = [f"[Question start]\n{query}\n[Question end]", f"[Response start]\n{response}\n[Response end]",
              f"[Format start]\n{format_spec}\n[Format end]"]
    if evidence:
        numbered = "\n\n".join(f"{i}. {passage}" for i, passage in enumerate(evidence, start=1))
        blocks.append(f"[Evidence start]\n{numbered}\n[Evidence end]")
    user = "Rewrite the response below following the format.\n\n" + "\n\n".join(blocks)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class ParsedRewrite:
    reasoning: str
    revised: str


def parse_rewrite(output: str) -> ParsedRewrite | None:
    """The `Reasoning:` and `Revised response:` fields; None when the output lacks the revised response."""
    head, marker, revised = output.partition("Revised response:")
    if not marker or not revised.strip() or "Revised response:" in revised:
        return None
    reasoning = head.split("Reasoning:", 1)[-1].strip()
    return ParsedRewrite(reasoning=reasoning, revised=revised.strip())


CALCULATOR = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
"""GSM8K's calculator annotations, `<<48/2=24>>`: the exact calculation of a step."""
EQUATION = re.compile(r"(?P<lhs>[\d.,$%]+(?:\s*[-+*/x×÷]\s*[\d.,$%()]+)+)\s*=\s*\$?(?P<rhs>[\d.,]+)")


def math_template_rewrite(response: str) -> str | None:
    """A step-per-line math solution ending `#### <answer>` (GSM8K) in the math_puzzles format, without a model:
    analysis, numbered solution, what each step calculates, result, conclusion. None if the response does not
    have that shape (the row then keeps its original)."""
    body, marker, answer = response.rpartition("####")
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    answer = answer.strip()
    if not marker or not lines or not answer:
        return None
    steps = [CALCULATOR.sub("", line) for line in lines]
    noun = "step" if len(steps) == 1 else "steps"
    analysis = (f"Analysis: The question asks for a single number. We work it out in {len(steps)} {noun}, "
                "each building on the quantities found before it.")
    solution = "Solution:\n" + "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))
    explained = [f"- Step {i} {_what_it_computes(line, step)}" for i, (line, step) in
                 enumerate(zip(lines, steps), start=1)]
    return "\n\n".join([analysis, solution, "Explanation:\n" + "\n".join(explained), f"Result: {answer}",
                        f"Conclusion: The answer is {answer}."])


def _what_it_computes(annotated: str, plain: str) -> str:
    calculations = [f"{lhs.strip()} = {rhs.strip()}" for lhs, rhs in CALCULATOR.findall(annotated)]
    if not calculations and (found := EQUATION.search(plain)):
        calculations = [f"{found['lhs'].strip()} = {found['rhs'].rstrip('.,')}"]
    if not calculations:
        return "states a fact of the problem that the next steps use."
    return f"computes {' and '.join(calculations)}."
