"""The compile-time policy of the method sandbox: RestrictedPython's, made
stricter, plus the rewrites that route loops, calls, operators and hashing
through the budgeted guards (see :mod:`caf_sharing.methods`)."""

from __future__ import annotations

import ast
from typing import Any, cast

from RestrictedPython.transformer import RestrictingNodeTransformer

_GLOBAL_NAME_OPS = frozenset({
    "LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "STORE_NAME", "DELETE_GLOBAL", "DELETE_NAME",
})

# RestrictedPython turns ``print`` into a call of this (absent) helper.
_PRINT_HELPER = "_print_"

_GUARDED_OPERATORS: dict[type[ast.operator], str] = {
    ast.Add: "_add_", ast.Mult: "_mul_", ast.Pow: "_pow_", ast.LShift: "_lshift_",
    ast.Mod: "_mod_", ast.FloorDiv: "_floordiv_", ast.BitOr: "_or_", ast.BitAnd: "_and_",
    ast.BitXor: "_xor_", ast.Sub: "_sub_",
}


def _call(helper: str, node: ast.AST, *args: ast.expr) -> ast.Call:
    """``helper(*args)``, placed at ``node`` (compile() needs every node placed)."""
    name = ast.copy_location(ast.Name(helper, ast.Load()), node)
    return ast.copy_location(ast.Call(func=name, args=list(args), keywords=[]), node)


class _MethodPolicy(RestrictingNodeTransformer):
    """RestrictedPython's policy, minus what a method that reads a map and
    returns a value never needs, plus the rewrites that meter it: a step at
    each loop iteration, comprehension item and call of a function the
    method defines, and the operators that create big values routed through
    their guards."""

    def _refuse(self, node: ast.AST, what: str) -> ast.AST:
        self.error(node, f"{what} not allowed in serialized methods")
        return node

    def visit_Import(self, node: ast.Import) -> ast.AST:
        return self._refuse(node, "imports are")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        return self._refuse(node, "imports are")

    def visit_Global(self, node: ast.Global) -> ast.AST:
        # Globals are shared by every call of a cached method: no state there.
        return self._refuse(node, "global statements are")

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        return self._refuse(node, "class definitions are")

    def visit_Yield(self, node: ast.Yield) -> ast.AST:
        # A generator would run the method's code later, outside call_method.
        return self._refuse(node, "yield is")

    def visit_YieldFrom(self, node: ast.YieldFrom) -> ast.AST:
        return self._refuse(node, "yield is")

    def visit_With(self, node: ast.With) -> ast.AST:
        # No value a method can reach is a context manager.
        return self._refuse(node, "with statements are")

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        if not isinstance(node.ctx, ast.Load):
            self.error(node, f"assigning or deleting attribute {node.attr!r} is not allowed "
                             "in serialized methods")
        return super().visit_Attribute(node)

    # -- metering ---------------------------------------------------------------

    _in_method = False

    def _step_statement(self, node: ast.AST) -> ast.stmt:
        return ast.copy_location(ast.Expr(_call("_step_", node)), node)

    def visit_For(self, node: ast.For) -> Any:
        node = cast(ast.For, super().visit_For(node))
        node.body.insert(0, self._step_statement(node))
        return node

    def visit_While(self, node: ast.While) -> Any:
        node = cast(ast.While, super().visit_While(node))
        node.body.insert(0, self._step_statement(node))
        return node

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> Any:
        node = cast(ast.ExceptHandler, super().visit_ExceptHandler(node))
        if node.type is None:
            # A bare except catches Exception only: a method never catches
            # the BaseException that ends it when it goes over budget.
            node.type = ast.copy_location(ast.Name("Exception", ast.Load()), node)
        node.body.insert(0, ast.copy_location(ast.Expr(_call("_caught_", node)), node))
        return node

    def visit_comprehension(self, node: ast.comprehension) -> Any:
        node = cast(ast.comprehension, super().visit_comprehension(node))
        node.ifs.insert(0, _call("_step_", node.iter))
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        # The first one is the method itself: call_method charges a step for
        # each nested call of it, so a top-level call pays none.
        outermost = not self._in_method
        self._in_method = True
        node = cast(ast.FunctionDef, super().visit_FunctionDef(node))
        if not outermost:
            node.body.insert(0, self._step_statement(node))
        return node

    def visit_Lambda(self, node: ast.Lambda) -> Any:
        node = cast(ast.Lambda, super().visit_Lambda(node))
        node.body = ast.copy_location(
            ast.BoolOp(op=ast.And(), values=[_call("_step_", node), node.body]), node.body)
        return node

    def visit_GeneratorExp(self, node: ast.GeneratorExp) -> Any:
        # Evaluated eagerly: a generator would be a lazy iterator to chain.
        node = cast(ast.GeneratorExp, super().visit_GeneratorExp(node))
        return ast.copy_location(ast.ListComp(elt=node.elt, generators=node.generators), node)

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        node = cast(ast.BinOp, super().visit_BinOp(node))
        helper = _GUARDED_OPERATORS.get(type(node.op))
        if helper is None:
            return node
        return _call(helper, node, node.left, node.right)

    def visit_Compare(self, node: ast.Compare) -> Any:
        node = cast(ast.Compare, super().visit_Compare(node))
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if isinstance(op, ast.In | ast.NotIn):
                operands[i] = _call("_key_", operands[i], operands[i])
                operands[i + 1] = _call("_scanned_", operands[i + 1], operands[i + 1])
            elif not isinstance(op, ast.Is | ast.IsNot):
                operands[i] = _call("_tree_", operands[i], operands[i])
                operands[i + 1] = _call("_tree_", operands[i + 1], operands[i + 1])
        for i, op in enumerate(node.ops):
            if isinstance(op, ast.In | ast.NotIn):
                operands[i] = _call("_tree_", operands[i], operands[i])
        node.left, node.comparators = operands[0], operands[1:]
        return node

    def visit_Starred(self, node: ast.Starred) -> Any:
        node = cast(ast.Starred, super().visit_Starred(node))
        if isinstance(node.ctx, ast.Load):
            node.value = _call("_star_", node.value, node.value)
        return node

    def visit_Dict(self, node: ast.Dict) -> Any:
        node = cast(ast.Dict, super().visit_Dict(node))
        node.values = [_call("_star_", value, value) if key is None else value
                       for key, value in zip(node.keys, node.values, strict=True)]
        node.keys = [None if key is None else _call("_key_", key, key) for key in node.keys]
        return node

    def visit_Set(self, node: ast.Set) -> Any:
        node = cast(ast.Set, super().visit_Set(node))
        for i, elt in enumerate(node.elts):
            if isinstance(elt, ast.Starred):
                elt.value = _call("_elements_", elt.value, elt.value)
            else:
                node.elts[i] = _call("_key_", elt, elt)
        return node

    def visit_DictComp(self, node: ast.DictComp) -> Any:
        node = cast(ast.DictComp, super().visit_DictComp(node))
        node.key = _call("_key_", node.key, node.key)
        return node

    def visit_SetComp(self, node: ast.SetComp) -> Any:
        node = cast(ast.SetComp, super().visit_SetComp(node))
        node.elt = _call("_key_", node.elt, node.elt)
        return node

    def visit_Subscript(self, node: ast.Subscript) -> Any:
        ctx = node.ctx
        new = super().visit_Subscript(node)
        if not isinstance(ctx, ast.Load):
            subscript = cast(ast.Subscript, new)
            subscript.slice = _call("_key_", subscript.slice, subscript.slice)
        return new

    def visit_keyword(self, node: ast.keyword) -> Any:
        node = cast(ast.keyword, super().visit_keyword(node))
        if node.arg is None:
            node.value = _call("_star_", node.value, node.value)
        return node

    def visit_FormattedValue(self, node: ast.FormattedValue) -> Any:
        node = cast(ast.FormattedValue, super().visit_FormattedValue(node))
        spec = node.format_spec
        if spec is None:
            spec = ast.copy_location(ast.Constant(""), node)
        conversion = ast.copy_location(ast.Constant(node.conversion), node)
        value = _call("_format_", node, node.value, spec, conversion)
        return ast.copy_location(ast.FormattedValue(value=value, conversion=-1), node)
