//! The pipeline dependency graph, declared as data, and the built-in resolver that answers from it.
//!
//! A configured graph is validated once at start-up (`DependencyGraph::new`), so resolution itself cannot meet a
//! cycle or an unknown phase.

use std::collections::BTreeSet;

use super::ids::PhaseName;
use super::input::{ResolvedPhase, ResolvedPipeline};
use super::ports::{BoxFuture, PipelineResolver, ResolveError, ResolveRequest};

/// Why a declared graph cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("'{0}' is not a known phase")]
    UnknownPhase(String),
    #[error("{0} is not a pipeline phase and cannot be a node of the pipeline graph")]
    NotAPipelinePhase(PhaseName),
    #[error("phase {0} is declared twice")]
    DuplicatePhase(PhaseName),
    #[error("phase {phase} depends on {dependency}, which is not declared in the graph")]
    UnknownDependency {
        phase: PhaseName,
        dependency: PhaseName,
    },
    #[error("the graph has a cycle through {0:?}")]
    Cycle(Vec<PhaseName>),
}

/// Phase → its direct dependencies, validated and with a fixed topological order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyGraph {
    /// Nodes in topological order, each with its direct dependencies (themselves in topological order).
    nodes: Vec<(PhaseName, Vec<PhaseName>)>,
}

impl DependencyGraph {
    /// The graph BOS ships with (ARCHITECTURE §3).
    pub const BUILTIN: &'static [(PhaseName, &'static [PhaseName])] = &[
        (PhaseName::Spellcheck, &[]),
        (PhaseName::Nlp, &[PhaseName::Spellcheck]),
        (PhaseName::CjAssessment, &[PhaseName::Spellcheck]),
        (
            PhaseName::AiFeedback,
            &[PhaseName::Spellcheck, PhaseName::Nlp],
        ),
    ];

    pub fn builtin() -> Self {
        Self::new(Self::BUILTIN.iter().map(|(p, deps)| (*p, deps.to_vec())))
            .unwrap_or_else(|_| unreachable!("the built-in graph is valid; a unit test checks it"))
    }

    /// Validates a declared graph: pipeline phases only, each declared once, every dependency declared, no cycle.
    pub fn new(
        edges: impl IntoIterator<Item = (PhaseName, Vec<PhaseName>)>,
    ) -> Result<Self, GraphError> {
        let mut declared: Vec<(PhaseName, Vec<PhaseName>)> = Vec::new();
        for (phase, deps) in edges {
            if !phase.is_pipeline_phase() {
                return Err(GraphError::NotAPipelinePhase(phase));
            }
            if declared.iter().any(|(p, _)| *p == phase) {
                return Err(GraphError::DuplicatePhase(phase));
            }
            let mut unique = Vec::new();
            for dep in deps {
                if !unique.contains(&dep) {
                    unique.push(dep);
                }
            }
            declared.push((phase, unique));
        }
        for (phase, deps) in &declared {
            for dep in deps {
                if !dep.is_pipeline_phase() {
                    return Err(GraphError::NotAPipelinePhase(*dep));
                }
                if !declared.iter().any(|(p, _)| p == dep) {
                    return Err(GraphError::UnknownDependency {
                        phase: *phase,
                        dependency: *dep,
                    });
                }
            }
        }
        let order = topological_order(&declared)?;
        let nodes = order
            .iter()
            .map(|phase| {
                let deps = declared
                    .iter()
                    .find(|(p, _)| p == phase)
                    .map(|(_, d)| d.clone())
                    .unwrap_or_default();
                let sorted = order.iter().copied().filter(|p| deps.contains(p)).collect();
                (*phase, sorted)
            })
            .collect();
        Ok(Self { nodes })
    }

    /// The same as `new`, from names as a configuration file spells them.
    pub fn from_names<S: AsRef<str>>(edges: &[(S, Vec<S>)]) -> Result<Self, GraphError> {
        let parse = |raw: &str| {
            PhaseName::parse("phase", raw).map_err(|_| GraphError::UnknownPhase(raw.to_owned()))
        };
        let mut typed = Vec::with_capacity(edges.len());
        for (phase, deps) in edges {
            let deps = deps
                .iter()
                .map(|d| parse(d.as_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            typed.push((parse(phase.as_ref())?, deps));
        }
        Self::new(typed)
    }

    /// Every phase of the graph, dependencies first.
    pub fn order(&self) -> impl Iterator<Item = PhaseName> + '_ {
        self.nodes.iter().map(|(p, _)| *p)
    }

    pub fn direct_deps(&self, phase: PhaseName) -> Option<&[PhaseName]> {
        self.nodes
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| d.as_slice())
    }

    /// The phases to run for `requested`: it and its transitive dependencies, minus the phases in `done`, in
    /// topological order. A done phase's own dependencies are not followed (they were satisfied when it ran). Each
    /// remaining phase lists all its direct dependencies, done or not, so the run can select the essays that
    /// succeeded in them. Everything done gives an empty pipeline: a run that completes at once.
    pub fn resolve(
        &self,
        requested: PhaseName,
        done: &[PhaseName],
    ) -> Result<ResolvedPipeline, ResolveError> {
        if !requested.is_pipeline_phase() {
            return Err(ResolveError::NotAPipelinePhase(requested));
        }
        if self.direct_deps(requested).is_none() {
            return Err(ResolveError::InvalidAnswer(format!(
                "phase {requested} is not in the dependency graph"
            )));
        }
        let mut needed = BTreeSet::new();
        let mut stack = vec![requested];
        while let Some(phase) = stack.pop() {
            if done.contains(&phase) || !needed.insert(phase) {
                continue;
            }
            stack.extend(self.direct_deps(phase).unwrap_or_default().iter().copied());
        }
        let phases = self
            .nodes
            .iter()
            .filter(|(p, _)| needed.contains(p))
            .map(|(phase, deps)| ResolvedPhase {
                phase: *phase,
                depends_on: deps.clone(),
            })
            .collect();
        Ok(ResolvedPipeline { phases })
    }
}

impl Default for DependencyGraph {
    fn default() -> Self {
        Self::builtin()
    }
}

/// Kahn's algorithm; ties go in declaration order so the result is stable.
fn topological_order(
    declared: &[(PhaseName, Vec<PhaseName>)],
) -> Result<Vec<PhaseName>, GraphError> {
    let mut order: Vec<PhaseName> = Vec::with_capacity(declared.len());
    while order.len() < declared.len() {
        let next = declared
            .iter()
            .find(|(p, deps)| !order.contains(p) && deps.iter().all(|d| order.contains(d)));
        match next {
            Some((phase, _)) => order.push(*phase),
            None => {
                let stuck = declared
                    .iter()
                    .map(|(p, _)| *p)
                    .filter(|p| !order.contains(p))
                    .collect();
                return Err(GraphError::Cycle(stuck));
            }
        }
    }
    Ok(order)
}

/// The resolver used when no Batch Conductor Service is configured.
#[derive(Debug, Clone, Default)]
pub struct BuiltinResolver {
    graph: DependencyGraph,
}

impl BuiltinResolver {
    pub fn new(graph: DependencyGraph) -> Self {
        Self { graph }
    }
}

impl PipelineResolver for BuiltinResolver {
    fn resolve<'a>(
        &'a self,
        request: &'a ResolveRequest,
    ) -> BoxFuture<'a, Result<ResolvedPipeline, ResolveError>> {
        let answer = self.graph.resolve(request.requested, &request.done);
        Box::pin(std::future::ready(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PhaseName::*;

    fn names(p: &ResolvedPipeline) -> Vec<PhaseName> {
        p.phases.iter().map(|p| p.phase).collect()
    }

    #[test]
    fn builtin_graph_orders_dependencies_first() {
        let g = DependencyGraph::builtin();
        assert_eq!(
            g.order().collect::<Vec<_>>(),
            vec![Spellcheck, Nlp, CjAssessment, AiFeedback]
        );
        let ai = g.resolve(AiFeedback, &[]).unwrap();
        assert_eq!(names(&ai), vec![Spellcheck, Nlp, AiFeedback]);
        assert_eq!(ai.phases[2].depends_on, vec![Spellcheck, Nlp]);
        assert_eq!(
            names(&g.resolve(Spellcheck, &[]).unwrap()),
            vec![Spellcheck]
        );
    }

    #[test]
    fn done_phases_are_pruned_but_still_listed_as_dependencies() {
        let g = DependencyGraph::builtin();
        let ai = g.resolve(AiFeedback, &[Spellcheck]).unwrap();
        assert_eq!(names(&ai), vec![Nlp, AiFeedback]);
        assert_eq!(ai.phases[0].depends_on, vec![Spellcheck]);
        assert_eq!(ai.phases[1].depends_on, vec![Spellcheck, Nlp]);
        assert!(g
            .resolve(CjAssessment, &[Spellcheck, CjAssessment])
            .unwrap()
            .phases
            .is_empty());
    }

    #[test]
    fn student_matching_cannot_be_resolved_or_declared() {
        let g = DependencyGraph::builtin();
        assert_eq!(
            g.resolve(StudentMatching, &[]),
            Err(ResolveError::NotAPipelinePhase(StudentMatching))
        );
        assert_eq!(
            DependencyGraph::new([(StudentMatching, vec![])]),
            Err(GraphError::NotAPipelinePhase(StudentMatching))
        );
    }

    #[test]
    fn bad_graphs_are_rejected() {
        assert_eq!(
            DependencyGraph::new([(Nlp, vec![Spellcheck])]),
            Err(GraphError::UnknownDependency {
                phase: Nlp,
                dependency: Spellcheck
            })
        );
        assert!(matches!(
            DependencyGraph::new([
                (Spellcheck, vec![AiFeedback]),
                (AiFeedback, vec![Spellcheck])
            ]),
            Err(GraphError::Cycle(_))
        ));
        assert_eq!(
            DependencyGraph::new([(Nlp, vec![]), (Nlp, vec![])]),
            Err(GraphError::DuplicatePhase(Nlp))
        );
        assert_eq!(
            DependencyGraph::from_names(&[("spellcheck", vec![]), ("grammar", vec!["spellcheck"])]),
            Err(GraphError::UnknownPhase("grammar".to_owned()))
        );
    }

    #[test]
    fn a_configured_graph_resolves_like_the_builtin_one() {
        let g = DependencyGraph::from_names(&[("nlp", vec!["spellcheck"]), ("spellcheck", vec![])])
            .unwrap();
        assert_eq!(names(&g.resolve(Nlp, &[]).unwrap()), vec![Spellcheck, Nlp]);
        assert!(matches!(
            g.resolve(AiFeedback, &[]),
            Err(ResolveError::InvalidAnswer(_))
        ));
    }
}
