"""Answer extraction: the formats real models write, including the ones common GSM8K scorers get wrong (lm-eval's
'#### (\\-?[0-9\\.\\,]+)' string match misses '#### 1,000' vs '1000', '$5.', '3.50' vs '3.5', fractions and boxed
answers; its last-number fallback turns '10-20' into -20 and '18.' into '18.')."""
import pytest

from peftlab.eval.extract import (extract_flexible, extract_strict, gold_answer, normalize, parse_number,
                                  same_number)

N = None
CASES = [  # (generation, strict, flexible)
    # GSM8K's own marker
    ("She has 3 + 4 = 7 apples.\n#### 7", 7, 7),
    ("####7", 7, 7),
    ("#### -12", -12, -12),                                   # negatives
    ("He owes money.\n#### \u22125", -5, -5),                 # unicode minus
    ("The total is 1,000 dollars.\n#### 1,000", 1000, 1000),  # thousands separators
    ("#### 1,234,567.", 1234567, 1234567),
    ("#### $5.", 5, 5),                                       # currency and a trailing period
    ("#### 0.25", 0.25, 0.25),
    ("#### .5", 0.5, 0.5),
    ("#### 12\n\nQ: Sam has 99 pens and 3 more", 12, 12),    # an answer followed by a runaway continuation
    ("The answer is 7.\n#### 8", 8, 8),                       # '####' outranks prose
    # self-corrections: the last answer given wins
    ("#### 7\nWait, I made a mistake: he had 8.\n#### 8", 8, 8),
    ("The answer is 7.\nActually, I forgot one. The answer is 8.", 8, 8),
    ("The answer is 8. Wait, no: 2 more came, so the answer is 10.", 10, 10),
    ("Final answer: 5\n... on second thought\nFinal answer: 6", 6, 6),
    ("\\boxed{5} is wrong, it is \\boxed{6}", 6, 6),
    # prose markers (MetaMath, Llama instruct, lm-eval CoT)
    ("The answer is: 18.", 18, 18),
    ("The answer is: 3.50", 3.5, 3.5),                        # decimals compare numerically
    ("So it costs $5.\nThe answer is $5.", 5, 5),
    ("The answer is -$4.", -4, -4),
    ("The answer is $-4", -4, -4),
    ("The answer is \\$1,234.50.", 1234.5, 1234.5),
    ("The answer is 45%", 45, 45),                            # percent: GSM8K golds carry no sign
    ("The answer is 3/4", 0.75, 0.75),                        # fractions
    ("The answer is 18 dollars and he saves 4 more.", 18, 18),  # a number inside units, then other numbers
    ("The answer is 5 + 3 = 8.", 8, 8),                       # an equation after the marker: its result
    # the answer sentence goes on: a later number counts only when announced as a restatement / result
    ("The final answer is 6 rows of 9 plus 4, i.e. 58", 58, 58),
    ("The final answer is 6 rows of 9 plus 4, i.e. 58.", 58, 58),
    ("The final answer is 6 rows of 9 plus 4, ie 58 chairs", 58, 58),
    ("The answer is 3 * 4 = 12 apples.", 12, 12),
    ("The answer is 12 - 5, which is 7.", 7, 7),
    ("The answer is 4 boxes of 6, so 24 eggs.", 24, 24),
    ("The answer is 2 dozen, that is 24.", 24, 24),
    ("The answer is 10 + 5 + 3, for a total of 18.", 18, 18),
    ("The answer is 1/2 of 30 = 15", 15, 15),
    ("The answer is $12 per hour times 5 hours = $60.", 60, 60),
    ("The answer is 2 times 9 plus 4 equals 22 marbles", 22, 22),
    ("The answer is 1,000 i.e. 1000", 1000, 1000),
    ("The final answer is: 12 - 4 = 8 cookies, and Sam keeps 2", 8, 8),
    ("The answer is 42 (6 times 7).", 42, 42),                # a justification after the answer
    ("The answer is 7 since he had 10 and gave 3 away.", 7, 7),
    ("The answer is 9 because 12 - 3 = 9.", 9, 9),
    ("The answer is 5 because 2 + 2 = 4 plus one.", 5, 5),
    ("The answer is 3 hours and 20 minutes", 3, 3),           # the story goes on: the first number
    ("The answer is 18. He then buys 2 more, so 20.", 18, 18),  # a new sentence is not the answer's
    ("The answer is 3.5 e.g. for 7 halves", 3.5, 3.5),
    ("the answer is 1{,}000", 1000, 1000),                    # LaTeX thousands separators
    ("The answer is 1\\,000", 1000, 1000),
    ("The final answer is 42", 42, 42),
    ("The final answer is: -0.25", -0.25, -0.25),
    ("**Final Answer:** 36", 36, 36),
    ("**The final answer is: 42**", 42, 42),
    ("Final Answer: The final answer is $\\boxed{18}$. I hope it is correct.", 18, 18),
    ("The answer is: $\\boxed{-7}$", -7, -7),
    ("Hmm, the answer is not obvious, he has 7 apples.", N, 7),  # a marker without a number is not an answer
    # \boxed
    ("\\boxed{\\frac{3}{4}}", 0.75, 0.75),
    ("so the result is \\boxed{-7}.", -7, -7),
    ("\\boxed{\\dfrac{9}{2}}", 4.5, 4.5),
    ("\\boxed{18 \\text{ dollars}}", 18, 18),
    ("\\boxed{2,500}", 2500, 2500),
    ("$\\frac{3}{4}$ of 20 is \\boxed{15}", 15, 15),
    # flexible fallback: the last number
    ("He earns 18 dollars per hour, so in 2 hours 36 dollars.", N, 36),
    ("It is -$4 in the end", N, -4),
    ("He read pages 10-20", N, 20),                           # a range, not -20
    ("Cases of COVID-19", N, 19),                             # a hyphen inside a word is not a sign
    ("20 - 5 leaves 15", N, 15),
    ("She pays 18.", N, 18),
    ("Half is 1/2", N, 0.5),
    ("It took 3/0 tries, then 6", N, 6),                      # a zero denominator is skipped
    ("no numbers here", N, N),
    ("", N, N),
    ("model v3.5 says nothing", N, N),                        # digits glued to letters/points are not answers
]


@pytest.mark.parametrize("text, strict, flexible", CASES)
def test_extraction(text, strict, flexible):
    s, f = extract_strict(text), extract_flexible(text)
    assert s is None if strict is None else same_number(s, strict), (text, s)
    assert f is None if flexible is None else same_number(f, flexible), (text, f)


def test_strict_is_a_subset_of_flexible():
    for text, _, _ in CASES:
        s = extract_strict(text)
        assert s is None or extract_flexible(text) == s


@pytest.mark.parametrize("answer, gold", [
    ("Tom has 3*4=<<3*4=12>>12 pens.\nHe gives 5 away: 12-5=<<12-5=7>>7.\n#### 7", 7),  # calculator annotations
    ("#### 1,080", 1080),
    ("#### -3", -3),
    ("She saves 0.5 of $7.\n#### 3.5", 3.5),
    ("So the total is 6+4=10.\nThe answer is: 10", 10),      # MetaMath's reference format
    ("72", 72),                                               # a bare number
    ("1,000", 1000),
    (" 18. ", 18),
    ("#### 7\n#### 8", 8),                                   # the last marker
    ("So 5+3=8.\nThe answer is: 8", 8),
])
def test_gold_answers(answer, gold):
    assert gold_answer(answer) == gold


@pytest.mark.parametrize("answer", [
    "He has 5 apples and eats 2, leaving 3.",  # free text: its first number (5) is not a gold answer
    "The answer is 3 apples and 2 pears",       # not a bare number after the closing phrase
    "",
    "#### none",
    "roughly 5",
])
def test_gold_answers_without_a_marker_are_refused(answer):
    assert gold_answer(answer) is None


def test_numbers_and_comparison():
    assert parse_number("$1,000.50") == 1000.5 and parse_number("-3") == -3 and parse_number("abc") is None
    assert parse_number("\\frac{3}{4}") == 0.75 and parse_number("$5.") == 5 and parse_number(None) is None
    assert normalize("\\dfrac{1}{2}") == "1/2"
    assert same_number(3.5, 3.50) and same_number(1 / 3 * 3, 1.0) and same_number(0.0, -0.0)
    assert not same_number(3.5, 3.51) and not same_number(None, 1) and not same_number(1, None)
    assert not same_number(1000, 1001) and not same_number(1e6, 1e6 + 2)  # relative tolerance 1e-6, not looser
