import textwrap

doc = textwrap.dedent("""
    Optimised configuration
    -----------------------
    Generators at their economic dispatch.
""").strip()
