"""Tools the agent calls: git operations confined to a workspace directory."""

from adapters.tools.git import (
    GitBranchesTool,
    GitCommitTool,
    GitCreateBranchTool,
    GitDiffTool,
    GitLogTool,
    GitRunner,
    GitShowFileTool,
    GitStatusTool,
    GitTool,
    git_tools,
)
from adapters.tools.workspace import Workspace

__all__ = [
    "GitBranchesTool",
    "GitCommitTool",
    "GitCreateBranchTool",
    "GitDiffTool",
    "GitLogTool",
    "GitRunner",
    "GitShowFileTool",
    "GitStatusTool",
    "GitTool",
    "Workspace",
    "git_tools",
]
