module.exports.handler = async (event, context) => {
  console.log(`invoked as ${context.functionName || 'hello_js'}`);
  return `Hello ${event.name || 'World'}!`;
};
