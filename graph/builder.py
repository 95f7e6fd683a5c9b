"""Wiring: the message graph and the summary graph, compiled where their resources live."""

from __future__ import annotations

from langgraph.graph import END, START, StateGraph

from graph import nodes
from graph.context import SummaryContext, TurnContext
from graph.state import SummaryState, TurnState
from graph.tracing import traced


def build_turn_graph() -> StateGraph[TurnState, TurnContext, TurnState, TurnState]:
    """retrieve memory -> persona -> budget -> (model -> [tools -> budget -> model]* -> persist
    | refuse)."""
    graph = StateGraph(TurnState, context_schema=TurnContext)
    for name, node in (
        ("retrieve_memory", nodes.retrieve_memory),
        ("apply_persona", nodes.apply_persona),
        ("reserve_budget", nodes.reserve_budget),
        ("call_model", nodes.call_model),
        ("run_tools", nodes.run_tools),
        ("persist", nodes.persist),
        ("refuse", nodes.refuse),
    ):
        graph.add_node(name, traced(name, node))
    graph.add_edge(START, "retrieve_memory")
    graph.add_edge("retrieve_memory", "apply_persona")
    graph.add_edge("apply_persona", "reserve_budget")
    graph.add_conditional_edges("reserve_budget", nodes.after_budget, ["call_model", "refuse"])
    graph.add_conditional_edges("call_model", nodes.after_model, ["run_tools", "persist"])
    # A tool round's results go back to the model, reserved from the budget like any call.
    graph.add_edge("run_tools", "reserve_budget")
    graph.add_edge("persist", END)
    graph.add_edge("refuse", END)
    return graph


def build_summary_graph() -> StateGraph[SummaryState, SummaryContext, SummaryState, SummaryState]:
    """transcript -> (summarise -> remember ->) close; a retry with a summary only remembers."""
    graph = StateGraph(SummaryState, context_schema=SummaryContext)
    for name, node in (
        ("load_transcript", nodes.load_transcript),
        ("summarise", nodes.summarise),
        ("remember", nodes.remember),
        ("close_session", nodes.close_session),
    ):
        graph.add_node(name, traced(name, node))
    graph.add_edge(START, "load_transcript")
    graph.add_conditional_edges(
        "load_transcript", nodes.after_transcript, ["summarise", "remember", "close_session"]
    )
    graph.add_conditional_edges("summarise", nodes.after_summary, ["remember", "close_session"])
    graph.add_edge("remember", "close_session")
    graph.add_edge("close_session", END)
    return graph
