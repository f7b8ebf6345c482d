"""The one exception type for what a user must fix."""


class OptiqError(ValueError):
    """A file, an argument or a setting the user must fix.

    The message names the file (when there is one) and the problem, and says
    what to do where that is not obvious. Library callers get the exception;
    only a command line (``mlx_lm.lora``, ``mlx_lm_optiq.*``) turns
    it into one line and an exit status.

    Args:
        problem: what is wrong.
        path: the file or directory it is wrong in, if any; the message then
          starts with it.
    """

    def __init__(self, problem, path=None):
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.path = path
        self.problem = problem
